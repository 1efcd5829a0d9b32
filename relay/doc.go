// Package relay will own the rendezvous/relay protocol between node agents and mesh-relay: its wire
// documentation, codec, client and server (node directory, punch coordination, datagram relay), with
// an ACL interface and a Limits struct. Nothing is implemented yet: nodes currently learn each other
// from the catalog source alone.
package relay
