"""Settings of the example shop: PostgreSQL and Redis on this machine (``SHOP_*`` variables override)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
env = os.environ.get

SECRET_KEY = env("SHOP_SECRET_KEY", "django-insecure-example-only")
DEBUG = env("SHOP_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_batches.django",  # manage.py batches_migrate
    "orders",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "shop_project.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                       "django.contrib.auth.context_processors.auth",
                                       "django.contrib.messages.context_processors.messages"]},
}]
DATABASES = {"default": {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": env("SHOP_DB_NAME", "shop"),
    "USER": env("SHOP_DB_USER", "postgres"),
    "PASSWORD": env("SHOP_DB_PASSWORD", ""),
    "HOST": env("SHOP_DB_HOST", "127.0.0.1"),
    "PORT": env("SHOP_DB_PORT", "5432"),
}}
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Celery (shop_project/celery.py reads every CELERY_* setting), and celery_batches under CELERY_BATCHES_*:
# no CELERY_BATCHES_DATABASE_URL, so the registry is the default database above.
CELERY_BROKER_URL = env("SHOP_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_TASK_DEFAULT_QUEUE = env("SHOP_QUEUE", "shop")
CELERY_BATCHES_TABLE_PREFIX = "shop_batches_"
