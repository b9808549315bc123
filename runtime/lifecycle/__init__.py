"""Services (drivers, consumers, processes): dependency order, start, restart, stop."""
