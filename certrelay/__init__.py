"""certrelay: relay certbot renewals from a container to host systemd units."""

__version__ = "0.1.0"
