"""gunicorn's entry point: ``wsgi:app``. Building the app opens nothing."""

from webpanel import create_app

app = create_app()
