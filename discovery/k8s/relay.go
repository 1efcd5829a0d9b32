package k8s

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
)

// maxSecretKey is the longest key a Secret's data may have.
const maxSecretKey = 253

// RelayConfig configures PublishRelay. Kubeconfig, RESTConfig, Client and Logger mean what they
// mean in Config.
type RelayConfig struct {
	Kubeconfig string
	RESTConfig *rest.Config
	Client     Client
	Logger     *slog.Logger
	// Namespace and Name name the relay Secret, which deploy/ ships: PublishRelay never creates
	// it. Required.
	Namespace, Name string
	// Key is the relay's libp2p peer ID, the Secret data key of its addresses, so that several
	// relays share the Secret. It must match [-._a-zA-Z0-9]+. Required.
	Key string
	// Addrs are the relay's multiaddrs, with /p2p/<peer ID>. At least one is required.
	Addrs []string
}

// PublishRelay writes cfg.Addrs, newline-separated, into data[cfg.Key] of the relay Secret with a
// JSON merge patch (so mesh-relay needs only the verb patch on that one Secret), for the agents'
// Sources to read (Config.RelaySecretName). It retries with back-off from 500 ms to 30 s, logging
// what to check, until the patch succeeds (nil) or ctx is done (an error wrapping ctx.Err()). It
// returns an error at once when cfg is invalid or the API client cannot be built.
func PublishRelay(ctx context.Context, cfg RelayConfig) error {
	if err := cfg.validate(); err != nil {
		return fmt.Errorf("publish relay addresses: %w", err)
	}
	secret := cfg.Namespace + "/" + cfg.Name
	client, err := newClient(cfg.Kubeconfig, cfg.RESTConfig, cfg.Client, "mesh-relay")
	if err != nil {
		return fmt.Errorf("publish relay addresses to Secret %s: %w", secret, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	routeKlog(log)
	log = log.With("component", "discovery/k8s", "secret", secret)

	// Secret data values are base64 in JSON; encoding/json writes []byte that way.
	body, err := json.Marshal(map[string]any{"data": map[string][]byte{cfg.Key: []byte(strings.Join(cfg.Addrs, "\n"))}})
	if err != nil {
		return fmt.Errorf("publish relay addresses to Secret %s: %w", secret, err)
	}
	delay := retryMin
	retry := time.NewTimer(delay)
	retry.Stop()
	defer retry.Stop()
	for {
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		err := client.MergePatch(rctx, ResourceSecrets, cfg.Namespace, cfg.Name, body,
			metav1.PatchOptions{FieldManager: fieldManager})
		cancel()
		if err == nil {
			log.Info("published the relay's addresses", "key", cfg.Key, "addrs", cfg.Addrs)
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("publish relay addresses to Secret %s: %w", secret, ctx.Err())
		}
		log.Error("cannot publish the relay's addresses", "err", err,
			"fix", secretPatchHint(err, cfg.Namespace, cfg.Name), "retry_in", delay)
		retry.Reset(delay)
		select {
		case <-ctx.Done():
			return fmt.Errorf("publish relay addresses to Secret %s: %w (last error: %v)", secret, ctx.Err(), err)
		case <-retry.C:
		}
		delay = min(2*delay, retryMax)
	}
}

func (cfg *RelayConfig) validate() error {
	if cfg.Namespace == "" || cfg.Name == "" {
		return errors.New("no relay Secret namespace or name")
	}
	if !isSecretKey(cfg.Key) {
		return fmt.Errorf("key %q is not a Secret data key (1-%d of [-._a-zA-Z0-9])", cfg.Key, maxSecretKey)
	}
	if len(cfg.Addrs) == 0 {
		return errors.New("no addresses")
	}
	for _, a := range cfg.Addrs {
		if strings.TrimSpace(a) == "" || strings.ContainsAny(a, ",\n") {
			return fmt.Errorf("address %q: empty, or has a comma or newline (the separators in the Secret)", a)
		}
	}
	return nil
}

// isSecretKey reports whether s is a valid key of a Secret's data.
func isSecretKey(s string) bool {
	if s == "" || len(s) > maxSecretKey || s == "." || s == ".." {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}

// secretPatchHint says how to fix a failed patch of the relay Secret.
func secretPatchHint(err error, namespace, name string) string {
	switch {
	case apierrors.IsNotFound(err):
		return fmt.Sprintf("Secret %s/%s not found: apply the relay manifests in deploy/ (mesh-relay never creates it)", namespace, name)
	case apierrors.IsForbidden(err):
		return fmt.Sprintf("mesh-relay's ServiceAccount may not patch the Secret: its Role in namespace %s (deploy/) needs the verbs get and patch on secrets with resourceNames [%s]", namespace, name)
	case apierrors.IsUnauthorized(err):
		return "the API server rejected mesh-relay's credentials: check its ServiceAccount token or kubeconfig"
	}
	return "check that the API server is reachable"
}
