"""``"celery_batches.django"`` in ``INSTALLED_APPS`` adds ``manage.py batches_migrate``; nothing else."""

from django.apps import AppConfig


class CeleryBatchesConfig(AppConfig):
    name = "celery_batches.django"
    label = "celery_batches"
    verbose_name = "Celery batches"
