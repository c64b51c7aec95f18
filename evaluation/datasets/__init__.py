"""Dataset readers, one module per dataset."""
