"""One module per CLI command; each registers itself on `xaicompress.cli_app.app`."""
