// Package relay owns the rendezvous and relay protocol between node agents and mesh-relay: its
// wire format (described here once), the server (registration with the join token, the binding of
// node names to keys, the node directory, hole-punch coordination and the datagram relay, with an
// ACL seam and per-node Limits) and the client the agent uses to stay registered with every relay
// it is given. It does not choose paths: overlay/path consumes the directory, punch signals and
// sessions the Client reports, and speaks the UDP frames of wire.go from the node's WireGuard socket.
//
// # Transport and authentication
//
// A relay is a go-libp2p host (TCP, Noise, yamux) whose Ed25519 identity is kept in its state
// directory, so its peer ID is stable across restarts. It also has a plain UDP socket on the same
// port number for the UDP frames. A node names a relay either as a multiaddr ending in /p2p/<peer
// ID> (libp2p's Noise handshake proves the peer ID) or as host:port; then the client learns the
// peer ID by dialling with a random one (the handshake fails and reveals the relay's authenticated
// ID), dials again with it, and trusts the relay only once its welcome proves it knows the join
// token (relayProof below). A stranger can thus neither register nor pose as the relay.
//
// # Control stream
//
// Each node keeps one long-lived libp2p stream to each relay, protocol ID /edgewire/relay/1.0.0.
// Frames are a 4-byte big-endian length followed by that many bytes of a JSON object with a
// "type" field; a length over 1 MiB (MaxControlFrame), or over 8 KiB before the other side has
// proved the join token (the challenge, the register, the welcome), or a body that is not such an
// object is a protocol error and ends the stream. A frame is refused from its length alone, and
// its buffer grows with the bytes that arrive, not with the length announced. Binary values (nonces, keys, proofs) are standard base64;
// addresses are strings ("fd65::1", "192.0.2.1:51820"). Unknown fields are ignored; unknown types
// are ignored (and counted by the relay).
//
//	relay → node  {"type":"challenge","nonce":N_r}                        N_r: 32 random bytes
//	node → relay  {"type":"register","name":..,"wireguardKey":..,"overlay":..,"lan":["ip:port",..],
//	               "nonce":N_n,"proof":P_n}
//	relay → node  {"type":"welcome","id":ID,"sessionKey":K,"udpPort":U,"relayProof":P_r,
//	               "keepaliveMs":T}
//	relay → node  {"type":"directory","nodes":[{"name","wireguardKey","overlay","lan","reflexive","id"},..]}
//	node → relay  {"type":"punch","peer":NAME}
//	relay → both  {"type":"punch","peer":OTHER,"peerReflexive":"ip:port","peerLAN":[..],"delayMs":D}
//	either        {"type":"ping","t":X}   answered by   {"type":"pong","t":X}
//	relay → node  {"type":"error","reason":TEXT}                          then the stream closes
//
// The proofs are HMAC-SHA256 keyed with the join token over four fields, each preceded by its
// length as 2 bytes big-endian: a label, the relay's peer ID, the node's peer ID (both as the
// bytes of their base58 text) and a nonce:
//
//	P_n = HMAC(token, "edgewire-register" | relay ID | node ID | N_r)   proves the node holds the token
//	P_r = HMAC(token, "edgewire-relay"    | relay ID | node ID | N_n)   proves the relay holds it
//
// Peer IDs are those Noise authenticated on the connection, so a proof cannot be replayed on
// another connection. The register must arrive within 10 s of the challenge.
//
// Registration: the relay checks P_n, then the ACL, then the name binding: the first registration
// of a name binds it to the node's peer ID and WireGuard key and assigns a node ID (a small
// integer, never 0), persisted in the state directory (bindings.json); a later registration of that
// name with other keys, or of those keys under another name, is refused. Re-registering with the
// same keys is fine and replaces the node's previous session. A refused node gets an error frame
// and its connection is closed: without a welcome it gets no directory, no punches and no relaying.
// The welcome carries the node's ID, a fresh 32-byte session key for its BIND frames, the relay's
// UDP port and the keepalive interval T. The relay's UDP socket knows the ID and key before the
// welcome leaves, so the node may BIND the moment the welcome arrives.
//
// Directory: after every change (a node registers or disconnects, or a BIND moves its reflexive
// address), debounced by 50 ms, the relay sends the full list of registered nodes to every node,
// itself included. "reflexive" is the address the relay last saw a valid BIND from, absent until
// the node has sent one.
//
// Punch coordination (DCUtR-style): the relay pings every node every T over the stream and keeps
// its last round-trip time. On a punch request naming a registered node, it sends a punch to both,
// each with the other's reflexive and LAN addresses and a delay D = (max(RTT_a, RTT_b) − RTT_self)/2,
// so both start sending when the later message has arrived. Requests are rate-limited per node
// (Limits.PunchRate); requests over the limit or for unknown nodes are dropped and counted.
//
// Keepalive: the relay's ping every T doubles as liveness; either side closes a stream silent for
// 3T. The client re-dials with back-off (200 ms doubling to 5 s) and registers again.
//
// Frames wait for a node's writer in a queue of 64 (pongs, punches; more are dropped and counted)
// and one directory slot: a newer directory replaces one not yet written (counted). A node that
// does not take a write within 10 s is closed (counted as slow).
//
// # What strangers can make the relay hold
//
// Until a node has registered, the relay bounds what its peer can make it hold (Limits, gate.go,
// resources.go): control streams being registered, in total (64) and per source address (an IPv4
// address or IPv6 /64: 8), each with frames of at most 8 KiB and closed RegisterTimeout (10 s)
// after it opened however its bytes trickle; connections on which no node is registered, in total
// (256) and per source address (32), each closed RegisterTimeout after its handshake unless a node
// registers on it (and again when its last session ends); and, in libp2p's resource manager,
// connections per source address (1024, loopback included) opened at 10 a second (burst 32), 4
// connections, 16 streams and 4 control streams per peer, yamux windows kept at 256 KiB, and
// totals sized from MaxNodes plus the caps above, not from the machine's memory. No connection
// manager trims registered nodes' connections. Every refusal is counted by reason in
// edgewire_relay_registrations_refused_total (frame_too_large, timeout, ...),
// edgewire_relay_unauth_refused_total and edgewire_relay_libp2p_refused_total.
//
// # UDP frames
//
// The relay's UDP socket speaks the frames documented in wire.go: BIND (MACed with the session key)
// binds the node's ID to the datagram's source address, the node's reflexive address, and is
// answered with BINDACK carrying that address. DATA from a bound address to a registered, bound
// destination ID is forwarded to the destination's bound address with the ID rewritten to the
// sender's; payloads are WireGuard datagrams, so relayed traffic stays end-to-end encrypted. Each
// node's DATA is limited by a token bucket (Limits.DataRate, DataBurst). Every other datagram —
// malformed, an unknown type, a bad MAC, an unbound source, an unknown or unbound destination, over
// the rate limit — is dropped and counted by reason (see the /metrics of mesh-relay).
package relay
