from django.db import connection, transaction
from django.http import JsonResponse
from django.views.decorators.http import require_POST

from shop_project.celery import batches

from .models import Order
from .tasks import charge, confirm, pack


def create_order(customer: str, total_cents: int) -> Order:
    """The order and its batch in one transaction: both or neither, and no job runs unless both are committed."""
    with transaction.atomic():
        order = Order.objects.create(customer=customer, total_cents=total_cents)
        with batches.batch(f"order-{order.pk}", connection=connection) as b:
            b.enqueue(charge, order.pk)
            b.enqueue(pack, order.pk)
            b.on_success(confirm, order.pk)
        order.batch_id = b.id
        order.save(update_fields=["batch_id"])
    return order


@require_POST
def place_order(request):
    order = create_order(request.POST["customer"], int(request.POST["total_cents"]))
    return JsonResponse({"order": order.pk, "batch": order.batch_id}, status=201)
