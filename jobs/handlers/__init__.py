"""Built-in job kinds; importing this package registers them."""

from jobs.handlers import demo  # noqa: F401
from jobs.llm import handler as llm  # noqa: F401
from jobs.webhooks import handler as webhooks  # noqa: F401
