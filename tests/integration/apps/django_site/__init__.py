"""A Django project for the route tests: admin, CSRF, LoginRequiredMiddleware and a throttling middleware."""
