from django.db import models


class Order(models.Model):
    customer = models.CharField(max_length=100)
    total_cents = models.PositiveIntegerField()
    charged = models.BooleanField(default=False)
    packed = models.BooleanField(default=False)
    #: how many times the batch's continuation confirmed it (once, always)
    confirmations = models.PositiveIntegerField(default=0)
    batch_id = models.CharField(max_length=36, blank=True)
