from django.db.models import F

from shop_project.celery import app, batches

from .models import Order


@batches.task
def charge(order_id: int) -> None:
    Order.objects.filter(pk=order_id).update(charged=True)


@batches.task
def pack(order_id: int) -> None:
    Order.objects.filter(pk=order_id).update(packed=True)


@app.task
def confirm(order_id: int) -> None:
    """The batch's continuation: runs once, when charge and pack both succeeded."""
    Order.objects.filter(pk=order_id).update(confirmations=F("confirmations") + 1)
