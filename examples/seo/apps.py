from django.apps import AppConfig


class SeoConfig(AppConfig):
    name = "seo"
    default_auto_field = "django.db.models.BigAutoField"
