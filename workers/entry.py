"""What `celery -A workers.entry` loads: the Flask app, and the Celery app configured on it."""

from __future__ import annotations

from celery import Celery

from app import create_app

# A worker serves no HTTP: the API's routes and their libraries are not loaded (issue 15 item 4).
flask_app = create_app(http=False)
celery_app: Celery = flask_app.extensions["celery"]
