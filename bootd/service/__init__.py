"""Services decide: registration, leases, boot-file choice, capsule selection."""
