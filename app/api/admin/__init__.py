"""Admin and operator routers (/v1/admin/...)."""
