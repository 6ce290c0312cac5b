# Django's usual Celery layout: the app is loaded with Django, so @shared_task and the dashboard find it.
from .celery import app as celery_app

__all__ = ["celery_app"]
