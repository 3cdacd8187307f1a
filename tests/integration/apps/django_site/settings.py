"""Settings of the test project; ROUTE_MIDDLEWARE_AT ("first" or "last") says where RouteMiddleware sits."""

from __future__ import annotations

import os

SECRET_KEY = "gunicorn-insight-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_site.urls"
LOGIN_URL = "/admin/login/"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_ROUTE = "gunicorn_insight.django.RouteMiddleware"
_DJANGO = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Answers 429 in process_request, before Django resolves the URL, like a rate limiter would.
    "django_site.views.ThrottleMiddleware",
]
MIDDLEWARE = [_ROUTE, *_DJANGO] if os.environ.get("ROUTE_MIDDLEWARE_AT") == "first" else [*_DJANGO, _ROUTE]
