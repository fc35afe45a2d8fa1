"""What `celery -A workers.entry` loads: the Flask app, and the Celery app configured on it."""

from __future__ import annotations

from celery import Celery

from app import create_app

flask_app = create_app()
celery_app: Celery = flask_app.extensions["celery"]
