"""The admin API and web console: the aiohttp app, who may call it, metrics export, listener."""
