"""Publishing: what leaves for the broker and what the broker still holds.

``publisher`` publishes a publication under its lease and flags what went out; ``sending`` sends a
chunk of messages as ``send_task`` would; ``wire`` writes a chunk to Redis or RabbitMQ at once;
``aftercommit`` publishes after the caller's own transaction; ``probe`` looks into the broker for
the lost-message search."""
