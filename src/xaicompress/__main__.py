from xaicompress.cli import run

run()
