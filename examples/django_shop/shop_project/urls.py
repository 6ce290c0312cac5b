from django.contrib import admin
from django.urls import include, path

from celery_batches.django import dashboard_urls
from orders.views import place_order

from .celery import batches

urlpatterns = [
    # before admin/: the dashboard, for staff users only (others are sent to the admin's login page)
    path("admin/batches/", include(dashboard_urls(batches))),
    path("admin/", admin.site.urls),
    path("orders/", place_order, name="place_order"),
]
