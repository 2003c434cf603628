"""chatloop: a chatbot service that keeps improving from its users' feedback."""

__version__ = "0.1.0"
