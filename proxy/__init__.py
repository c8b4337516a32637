"""bifrost-video-proxy: a caching, validating proxy for Bifrost's video API."""

__version__ = "0.1.0"
