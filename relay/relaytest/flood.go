// Package relaytest holds what tests of mesh-relay from outside package relay need of libp2p, so
// that they need not import it themselves: Flood, a crowd of strangers that open control streams
// to a relay and never register.
package relaytest

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/edgewire/edgewire/relay"
)

// FloodConfig describes a flood of unauthenticated control streams.
type FloodConfig struct {
	// Relay is the relay's multiaddr, ending in /p2p/<peer ID>.
	Relay string
	// Peers is how many libp2p identities the streams come from (default 8); the streams are
	// spread over them evenly.
	Peers int
	// Streams is how many control streams are kept open, or being opened, at once (default 500).
	Streams int
	// Concurrency bounds the streams being opened at once (default 64).
	Concurrency int
	// Announce is the frame length each stream announces, Send how many bytes of that frame it
	// then sends before holding the stream open. Zero Announce means relay.MaxControlFrame (the
	// largest frame a relay accepts after authentication), and zero Send all but the frame's last
	// byte: the relay would hold nearly the whole frame, waiting for one more byte. PartialEvery
	// = n makes every n-th stream announce PartialAnnounce bytes and send half instead.
	Announce        uint32
	Send            int
	PartialEvery    int
	PartialAnnounce uint32
	// Duration is how long the flood lasts (default 30 s): a stream is held until the relay closes
	// it or the flood ends, and one the relay refused or closed is opened again after Retry
	// (default 1 s).
	Duration time.Duration
	Retry    time.Duration
}

// FloodResult counts what became of the streams.
type FloodResult struct {
	// Attempts to open a stream; Opened those libp2p opened; Challenged those the relay answered
	// with its challenge (it admitted them); Refused those it reset or refused before that.
	Attempts, Opened, Challenged, Refused int
	// ClosedByRelay counts admitted streams the relay closed before the flood ended, and
	// LongestOpen is the longest an admitted stream stayed open, from its challenge to its end.
	ClosedByRelay int
	LongestOpen   time.Duration
	// Sent is the frame bytes written.
	Sent int64
	// Errors are a few of the errors seen, for the log.
	Errors []string
}

func (c *FloodConfig) defaults() {
	if c.Peers <= 0 {
		c.Peers = 8
	}
	if c.Streams <= 0 {
		c.Streams = 500
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 64
	}
	if c.Announce == 0 {
		c.Announce = relay.MaxControlFrame
	}
	if c.Send <= 0 {
		c.Send = int(c.Announce) - 1
	}
	if c.Duration <= 0 {
		c.Duration = 30 * time.Second
	}
	if c.Retry <= 0 {
		c.Retry = time.Second
	}
}

// flood is one run of Flood.
type flood struct {
	cfg   FloodConfig
	relay peer.ID
	end   time.Time
	slots chan struct{} // streams being opened

	attempts, opened, challenged, refused, closed atomic.Int64
	sent, longest                                 atomic.Int64

	mu   sync.Mutex // guards errs
	errs []string
}

// Flood keeps cfg.Streams control streams open to the relay, or being opened, from cfg.Peers
// identities for cfg.Duration or until ctx ends. Each stream sends the start of a frame and is
// held; a refused or closed one is opened again after cfg.Retry. Flood returns once every stream
// and every host it made is closed.
func Flood(ctx context.Context, cfg FloodConfig) (FloodResult, error) {
	cfg.defaults()
	m, err := ma.NewMultiaddr(cfg.Relay)
	if err != nil {
		return FloodResult{}, fmt.Errorf("relay address %q: %w", cfg.Relay, err)
	}
	info, err := peer.AddrInfoFromP2pAddr(m)
	if err != nil {
		return FloodResult{}, fmt.Errorf("relay address %q: %w", cfg.Relay, err)
	}
	hosts := make([]host.Host, 0, cfg.Peers)
	defer func() {
		for _, h := range hosts {
			h.Close()
		}
	}()
	for range cfg.Peers {
		priv, _, err := crypto.GenerateEd25519Key(rand.Reader)
		if err != nil {
			return FloodResult{}, fmt.Errorf("stranger key: %w", err)
		}
		h, err := libp2p.New(libp2p.Identity(priv), libp2p.NoListenAddrs,
			libp2p.Transport(tcp.NewTCPTransport), libp2p.Security(noise.ID, noise.New),
			libp2p.Muxer(yamux.ID, yamux.DefaultTransport), libp2p.DisableRelay(), libp2p.DisableMetrics(),
			libp2p.Ping(false))
		if err != nil {
			return FloodResult{}, fmt.Errorf("stranger host: %w", err)
		}
		h.Peerstore().AddAddrs(info.ID, info.Addrs, time.Hour)
		hosts = append(hosts, h)
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	f := &flood{cfg: cfg, relay: info.ID, end: time.Now().Add(cfg.Duration), slots: make(chan struct{}, cfg.Concurrency)}
	var wg sync.WaitGroup
	for i := range cfg.Streams {
		announce, send := cfg.Announce, cfg.Send
		if cfg.PartialEvery > 0 && i%cfg.PartialEvery == 0 {
			announce, send = cfg.PartialAnnounce, int(cfg.PartialAnnounce)/2
		}
		frame := binary.BigEndian.AppendUint32(make([]byte, 0, 4+send), announce)
		frame = append(frame, make([]byte, send)...)
		h := hosts[i%len(hosts)]
		wg.Go(func() {
			for ctx.Err() == nil {
				f.stream(ctx, h, frame)
				select {
				case <-ctx.Done():
				case <-time.After(cfg.Retry):
				}
			}
		})
	}
	wg.Wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	res := FloodResult{
		Attempts: int(f.attempts.Load()), Opened: int(f.opened.Load()), Challenged: int(f.challenged.Load()),
		Refused: int(f.refused.Load()), ClosedByRelay: int(f.closed.Load()),
		LongestOpen: time.Duration(f.longest.Load()), Sent: f.sent.Load(), Errors: f.errs,
	}
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return res, err
	}
	return res, nil
}

func (f *flood) note(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.errs) < 8 {
		f.errs = append(f.errs, err.Error())
	}
}

// stream opens one control stream from h, sends frame on it and holds it until the relay closes
// it or the flood ends.
func (f *flood) stream(ctx context.Context, h host.Host, frame []byte) {
	select {
	case f.slots <- struct{}{}:
	case <-ctx.Done():
		return
	}
	released := false
	release := func() {
		if !released {
			released = true
			<-f.slots
		}
	}
	defer release()
	f.attempts.Add(1)
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	st, err := h.NewStream(network.WithForceDirectDial(sctx, "flood"), f.relay, relay.ProtocolID)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			f.refused.Add(1)
			f.note(err)
		}
		return
	}
	defer st.Reset()
	f.opened.Add(1)
	st.SetDeadline(f.end)
	var hdr [4]byte
	_, err = io.ReadFull(st, hdr[:])
	if err == nil {
		_, err = io.ReadFull(st, make([]byte, min(binary.BigEndian.Uint32(hdr[:]), 4096)))
	}
	if err != nil {
		if !isTimeout(err) {
			f.refused.Add(1)
			f.note(err)
		}
		return
	}
	f.challenged.Add(1)
	opened := time.Now()
	// The next stream may open while this one sends and holds.
	release()
	n, err := st.Write(frame)
	f.sent.Add(int64(n))
	if err == nil {
		// Hold: until the relay closes the stream, or the flood ends.
		_, err = io.Copy(io.Discard, st)
	}
	for d := int64(time.Since(opened)); ; {
		old := f.longest.Load()
		if d <= old || f.longest.CompareAndSwap(old, d) {
			break
		}
	}
	if !isTimeout(err) {
		f.closed.Add(1)
	}
}

func isTimeout(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}
