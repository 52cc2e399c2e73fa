"""The operator's live dashboard (docs/dashboard.md): ``feed.py`` the event ring (pure),
``service.py`` the page, its data and its live stream; ``page.html``, ``app.js`` and
``app.css`` are the page itself (package data).
"""
