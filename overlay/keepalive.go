package overlay

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/edgewire/edgewire/overlay/identity"
	"github.com/edgewire/edgewire/overlay/path"
)

// keepaliveDelay is how long the node with the higher key waits, after its first path to a peer
// answered, before it turns the peer's persistent keepalive on.
const keepaliveDelay = 1500 * time.Millisecond

// keepaliveState tracks when a peer's persistent keepalive goes on. Turning it on makes
// wireguard-go send a keepalive at once, which starts a handshake when there is no session; and
// wireguard-go sends no second initiation within 5 s of the first, even when the first went
// nowhere. So the handshake waits for a path that answered probes, and only one side starts it: when
// both initiate at the same moment each initiation invalidates the other's, and both wait 5 s. The
// node with the lower key turns the keepalive on as soon as a path answers; the other after
// keepaliveDelay, when the session normally exists already.
type keepaliveState struct {
	confirmed time.Time // when a path first answered
	on        bool
}

// setEndpoint points wireguard-go's peer at endpoint (update_only never resurrects a removed peer)
// and, once a path answered, turns the persistent keepalive on as keepaliveState describes.
func (m *mesh) setEndpoint(peer [32]byte, endpoint string, kind path.Kind) error {
	conf := fmt.Sprintf("public_key=%s\nupdate_only=true\nendpoint=%s\n", hex.EncodeToString(peer[:]), endpoint)
	if kind != path.KindNone {
		m.mu.Lock()
		st := m.keepalive[peer]
		if st == nil {
			st = &keepaliveState{confirmed: time.Now()}
			m.keepalive[peer] = st
		}
		if !st.on && bytes.Compare(m.id.WireGuardPublic[:], peer[:]) < 0 {
			conf += fmt.Sprintf("persistent_keepalive_interval=%d\n", PersistentKeepalive)
			st.on = true
		}
		m.mu.Unlock()
	}
	return m.dev.IpcSet(conf)
}

// keepaliveLoop turns on the keepalive of peers whose delay has passed.
func (m *mesh) keepaliveLoop() {
	defer m.wg.Done()
	t := time.NewTicker(keepaliveDelay / 4)
	defer t.Stop()
	for {
		select {
		case <-m.done:
			return
		case now := <-t.C:
			var due []identity.Key
			m.mu.Lock()
			for k, st := range m.keepalive {
				if !st.on && now.Sub(st.confirmed) >= keepaliveDelay {
					st.on = true
					due = append(due, k)
				}
			}
			m.mu.Unlock()
			for _, k := range due {
				conf := fmt.Sprintf("public_key=%s\nupdate_only=true\npersistent_keepalive_interval=%d\n", hex.EncodeToString(k[:]), PersistentKeepalive)
				if err := m.dev.IpcSet(conf); err != nil {
					m.logger.Warn("wireguard: persistent keepalive", "peer", k.String(), "err", err)
				}
			}
		}
	}
}
