from __future__ import annotations

from django.contrib import admin
from django.urls import path

from . import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("items/<int:pk>/", views.item),
    path("private/", views.private),
]
