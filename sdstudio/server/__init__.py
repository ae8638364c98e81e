"""``sdstudio serve``: AUTOMATIC1111's /sdapi/v1 and our /sdapi/v2 job API over a durable SQLite queue."""
