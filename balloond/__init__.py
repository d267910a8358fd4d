"""balloond: a vhost-user backend for virtio-balloon free page reporting."""

__version__ = "0.1.0"
