"""The simulated provider's OpenAI-compatible routes, mounted at /simulated/v1/."""

from __future__ import annotations

from django.urls import path

from config.simulator import simulated

app_name = "simulated"

urlpatterns = [
    path("chat/completions", simulated.chat_completions, name="chat-completions"),
    path("models", simulated.models, name="models"),
]
