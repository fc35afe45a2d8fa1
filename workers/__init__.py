"""Celery workers: the tasks (`workers.tasks`) and the module the `celery` command loads (`workers.entry`)."""
