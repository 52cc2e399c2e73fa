"""segproxy: a self-hosted first-party proxy for Segment's CDN and Tracking API."""

from segproxy import native

__version__ = "0.1.0"

native.select()  # before any other segproxy module: the compiled build, or all the source
