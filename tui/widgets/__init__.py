"""The dashboard's panels; each has `show(state, now)` and draws only from the DashboardState."""
