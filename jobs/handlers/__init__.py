"""Built-in job kinds of no feature of their own (demo.py). `JobsConfig.ready()`
imports them, and the feature handlers (jobs.llm.handler,
jobs.webhooks.handler), so that they register."""
