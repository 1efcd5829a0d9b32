package forward

import (
	"context"
	"net"
	"net/netip"
	"time"
)

// DefaultSpareMaxAge is how long a spare connection waits to be used before the Dialer closes it. It
// must stay below the remote Listener's HeaderTimeout (DefaultHeaderTimeout, 5 s), which would
// otherwise close it first.
const DefaultSpareMaxAge = 2 * time.Second

// DialerStats are a Dialer's TCP counters.
type DialerStats struct {
	SpareDials uint64 // TCP Dials that used a spare connection
	FreshDials uint64 // TCP Dials that connected afresh (no spare ready, or the spare had died)
	DeadSpares uint64 // spares found dead at use (the Dial then connected afresh)
	EarlyDials uint64 // TCP Dials that sent the client's first bytes before the status (EarlyData)
	Spares     uint64 // spare connections ready now
}

// Stats returns the Dialer's counters.
func (d *Dialer) Stats() DialerStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.stats
	for _, s := range d.pool {
		st.Spares += uint64(len(s.idle))
	}
	return st
}

// spare is a connected TCP connection to a Listener that has not sent its header yet.
type spare struct {
	conn *net.TCPConn
	at   time.Time
}

// spares are the Dialer's spare connections and refills for one server.
type spares struct {
	idle    []spare // oldest first
	dialing int     // refills in flight
}

// takeSpare returns the newest spare connection to server young enough to use, or nil, and starts
// refills so that server has Spares connections ready or coming. Expired spares are closed.
func (d *Dialer) takeSpare(server netip.AddrPort) *net.TCPConn {
	if d.Spares <= 0 {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	if d.pool == nil {
		d.pool = make(map[netip.AddrPort]*spares)
		d.ctx, d.cancel = context.WithCancel(context.Background())
	}
	s := d.pool[server]
	if s == nil {
		s = &spares{}
		d.pool[server] = s
	}
	d.expireLocked(s, time.Now())
	var c *net.TCPConn
	if n := len(s.idle); n > 0 {
		c = s.idle[n-1].conn
		s.idle[n-1] = spare{}
		s.idle = s.idle[:n-1]
	}
	for len(s.idle)+s.dialing < d.Spares {
		s.dialing++
		d.wg.Add(1)
		go d.refill(server, s)
	}
	return c
}

// refill dials one spare connection to server in the background.
func (d *Dialer) refill(server netip.AddrPort, s *spares) {
	defer d.wg.Done()
	ctx, cancel := context.WithTimeout(d.ctx, d.timeout())
	defer cancel()
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp", server.String())
	d.mu.Lock()
	defer d.mu.Unlock()
	s.dialing--
	if err != nil {
		return
	}
	conn := c.(*net.TCPConn)
	if d.closed {
		conn.Close()
		return
	}
	s.idle = append(s.idle, spare{conn: conn, at: time.Now()})
	// The spare expires on its own: an idle Dialer holds none. Close stops the timers.
	var t *time.Timer
	t = time.AfterFunc(d.spareMaxAge(), func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		delete(d.timers, t)
		if !d.closed {
			d.expireLocked(s, time.Now())
			if len(s.idle) == 0 && s.dialing == 0 && d.pool[server] == s {
				delete(d.pool, server)
			}
		}
	})
	if d.timers == nil {
		d.timers = make(map[*time.Timer]struct{})
	}
	d.timers[t] = struct{}{}
}

// expireLocked closes the spares of s older than the maximum age.
func (d *Dialer) expireLocked(s *spares, now time.Time) {
	maxAge := d.spareMaxAge()
	n := 0
	for n < len(s.idle) && now.Sub(s.idle[n].at) >= maxAge {
		s.idle[n].conn.Close()
		n++
	}
	if n > 0 {
		rest := copy(s.idle, s.idle[n:])
		clear(s.idle[rest:])
		s.idle = s.idle[:rest]
	}
}

func (d *Dialer) spareMaxAge() time.Duration {
	if d.SpareMaxAge > 0 {
		return d.SpareMaxAge
	}
	return DefaultSpareMaxAge
}

func (d *Dialer) timeout() time.Duration {
	if d.Timeout > 0 {
		return d.Timeout
	}
	return DefaultDialTimeout
}

// Close closes the spare connections, stops the refills and waits for them. Dial still works
// afterwards, without spares. Close is idempotent.
func (d *Dialer) Close() error {
	d.mu.Lock()
	d.closed = true
	if d.cancel != nil {
		d.cancel()
	}
	for t := range d.timers {
		t.Stop()
		delete(d.timers, t)
	}
	for server, s := range d.pool {
		for _, sp := range s.idle {
			sp.conn.Close()
		}
		s.idle = nil
		delete(d.pool, server)
	}
	d.mu.Unlock()
	d.wg.Wait()
	return nil
}
