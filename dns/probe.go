package dns

import (
	"context"
	"fmt"
	"net"
	"time"

	mdns "github.com/miekg/dns"
)

// Probe asks the server at addr ("ip:port") over TCP for the SOA of zone and checks the answer: a
// round trip through everything between the caller and the server (in the agent: the kernel's route
// to the TUN, the service netstack, the DNS server and back). It is the agent's readiness check.
// dial opens the connection; nil means a net.Dialer. Without a deadline on ctx the exchange is
// bounded by DefaultForwardTimeout.
func Probe(ctx context.Context, dial func(ctx context.Context, network, address string) (net.Conn, error), addr, zone string) error {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(DefaultForwardTimeout)
	}
	if dial == nil {
		dial = new(net.Dialer).DialContext
	}
	conn, err := dial(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("dns probe %s: %w", addr, err)
	}
	defer conn.Close()
	conn.SetDeadline(deadline)
	q := new(mdns.Msg)
	q.SetQuestion(mdns.Fqdn(zone), mdns.TypeSOA)
	co := &mdns.Conn{Conn: conn}
	if err := co.WriteMsg(q); err != nil {
		return fmt.Errorf("dns probe %s: write: %w", addr, err)
	}
	r, err := co.ReadMsg()
	if err != nil {
		return fmt.Errorf("dns probe %s: read: %w", addr, err)
	}
	if r.Id != q.Id || r.Rcode != mdns.RcodeSuccess || len(r.Answer) == 0 {
		return fmt.Errorf("dns probe %s: SOA %s: rcode %s, %d answers", addr, zone, mdns.RcodeToString[r.Rcode], len(r.Answer))
	}
	return nil
}
