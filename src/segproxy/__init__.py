"""segproxy: a self-hosted first-party proxy for Segment's CDN and Tracking API."""

__version__ = "0.1.0"
