from honed.cli import app

app()
