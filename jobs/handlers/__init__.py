"""Built-in job kinds; importing this package registers them."""

from jobs.handlers import demo, llm  # noqa: F401
