"""An example app of your own: a small offline SEO audit (README "Your own jobs")."""
