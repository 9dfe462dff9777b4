"""Twilio's formats: TwiML builders, request signatures, the XML text filter."""
