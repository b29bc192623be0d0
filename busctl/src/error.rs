/// What can go wrong running a command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker refused or could not be reached.
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    /// The bus's transport failed.
    #[error(transparent)]
    Bus(#[from] bus_core::Error),
    /// The bus's RabbitMQ transport could not connect.
    #[error(transparent)]
    Transport(#[from] bus_rabbitmq::Error),
    /// The management API answered with an error.
    #[error("management API: {0}")]
    Management(String),
    /// A queue the command needs does not exist.
    #[error("queue `{0}` does not exist")]
    NoSuchQueue(String),
    /// The command's input is not what it needs.
    #[error("{0}")]
    Usage(String),
    /// Reading a file or the terminal, or writing the output, failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A publish was not confirmed by the broker: the message stays where it was.
    #[error("the broker did not confirm the publish to `{0}`; the message stays in the error queue")]
    NotConfirmed(String),
}

/// The result of a command.
pub type Result<T, E = Error> = std::result::Result<T, E>;
