"""livesplice: rebootless security updates for the running Linux kernel, after Ksplice."""

__version__ = "0.1.0"
