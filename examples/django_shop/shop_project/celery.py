"""The Celery app of the shop and its batches: ``celery -A shop_project worker -l INFO``.

``Batches(app)`` is given no database URL: it uses Django's ``default`` database, so an order and its
batch can be written in one transaction. Every ``CELERY_BATCHES_*`` Django setting configures it.
"""

import os

from celery import Celery

from celery_batches import Batches

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_project.settings")

app = Celery("shop_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
batches = Batches(app)
