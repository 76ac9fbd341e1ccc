"""Built-in job kinds; importing this package registers them."""

from jobs.handlers import demo, llm, webhooks  # noqa: F401
