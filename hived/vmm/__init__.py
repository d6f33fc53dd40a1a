"""VMM drivers: one module per VMM behind the small interface in hived.vmm.base."""
