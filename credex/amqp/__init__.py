"""RabbitMQ for the workers, on pika's SelectConnection driven step by step.

    params.py      where the broker is: connection parameters from a URL, the URL as it may be
                   shown (never its password), pika's logging kept quiet
    topology.py    exchanges, queues and bindings as data, and their declaration
    connection.py  one connection and channel, the I/O loop turned only while a caller waits
    confirms.py    publishing in confirm mode: many messages in flight, their outcomes collected
    broker.py      what a worker holds: the connection, publishing with confirms, one consumer

Nothing here knows the outbox or the warehouse: the workers hand it messages and take deliveries.
Importing this package (or ``topology``) does not import pika.
"""
