"""The dashboard's modal screens: pin, policy, filter, help."""
