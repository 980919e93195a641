"""MQTT for the hub: the embedded amqtt broker and the external-broker bridge.

Layer: bridges; imports the `hub` core, `bridges.transport`, `bridges.listen`,
amqtt and paho-mqtt. Never `tasks`, `firmware_sim` or the composition root.

One concern per module (docs/mqtt.md, "How the embedded broker is built"):

- `broker`: `EmbeddedMqtt`, the facade the hub starts, and `HubBroker`,
  amqtt's `Broker` composed of the classes below;
- `sessions`: session takeover (who may take a client id, which session a
  CONNECT continues);
- `subscriptions`: the pure subscription index (no amqtt, no asyncio);
- `reachability`: which devices can receive commands here;
- `delivery`: subscriptions, retained messages, offline queues, QoS of
  deliveries;
- `qos`: the QoS 1 and 2 flows of amqtt's protocol handler, fixed;
- `tap`: the publish tap and the PUBACK-after-durable rule, shared with the
  external bridge;
- `reader`: the packet reader (the rules themselves are `hub.mqtt_rules`);
- `listener`: binding the port, the connection limit;
- `auth`: authentication and ACL, as amqtt plugins;
- `state`: the typed per-session state;
- `external`: the external-broker bridge (paho-mqtt, shared subscriptions).

Nothing is re-exported here: import from the module that owns a name.
"""
