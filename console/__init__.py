"""The console: a web application and HTTP API for the people who run the fleet.

Layer: console; imports the `hub` core and `tasks` (to send commands and
control messages through RabbitMQ), never `bridges`, `firmware_sim` or the
composition root `hubapp`.
`hub console` runs it as a process of its own, so that the hub and the
console can each fail, restart and be upgraded without the other.
"""
