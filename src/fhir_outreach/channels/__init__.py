"""Channels: deliver journey messages (email, SMS, Teams, portal, push), governed and observable."""
